"""Analysis tools and inference-time attention edits (probability/logit hooks, head tools)."""
from attnjax.analysis.causality import (CausalityResult, check_causal_cross,
                                        check_causal_decode, check_causal_prefix,
                                        check_causal_self)
from attnjax.analysis.edits import (act_calibrate, boost_token_attention, find_hidden_sinks,
                                    find_sink_tokens, hooked_attention, image_centric_rows,
                                    redistribute_attention)
from attnjax.analysis.imbalance import (cls_attention_scores, dual_stream_token_selection,
                                        fix_imbalanced_attention, iqr_outliers,
                                        received_attention_scores, top_fraction,
                                        visual_key_mask, visual_sensitivity)
from attnjax.analysis.heads import (apply_head_mask, head_divergence, retrieval_score_step,
                                    scale_heads, select_top_heads, sink_metrics,
                                    top1_attention_index)
from attnjax.analysis.rope_drift import rope_in_dtype, rope_shift_deviation
