"""The pCTR reward model and the reward R."""
