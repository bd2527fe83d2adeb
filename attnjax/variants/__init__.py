"""Dense softmax variants that are more than a score function: MoH head mixtures, DiTCtrl KV-sharing."""
from attnjax.variants.ditctrl import kv_shared_attention, mask_guided_kv_sharing, token_attention_mask
from attnjax.variants.moh import MoHAttention, moh_balance_loss, moh_gates
