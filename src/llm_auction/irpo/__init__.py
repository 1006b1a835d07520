"""IRPO: sampling, preference pairs, DPO training, distributed launch."""
