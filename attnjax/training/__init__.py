"""Training techniques around attention: adversarial perturbations of attention scores (AT/iAT/VAT)."""
from attnjax.training.perturbation import adversarial_attention_perturbation, attention_vat_loss
