"""dpo_dist: distributed on-policy DPO -- generate, judge, reference log-probs, train, evaluate."""

__version__ = "0.1.0"
