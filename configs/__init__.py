"""Experiment configs (ml_collections): ``--config=configs/<name>.py[:<family>]``."""
