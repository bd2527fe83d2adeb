"""Training techniques around attention: adversarial score perturbations (AT/iAT/VAT) and
head-restricted fine-tuning."""
from attnjax.training.heads import head_gradient_mask, mask_updates
from attnjax.training.perturbation import adversarial_attention_perturbation, attention_vat_loss
