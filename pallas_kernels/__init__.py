"""Pallas kernels of attnjax (block-sparse, neighborhood, linear) and their compile targets.

The kernels build on ``attnjax.masks``, ``attnjax.core`` and ``attnjax.plan``,
and ``attnjax`` registers them as backends when it is imported. Importing
``attnjax`` here first makes ``import pallas_kernels.<package>`` (without
importing ``attnjax`` before) initialise the modules in the same order as
``import attnjax`` does, instead of meeting a partly initialised kernel package.
"""
import attnjax  # noqa: F401  pylint: disable=unused-import
