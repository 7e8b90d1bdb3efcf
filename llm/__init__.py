"""Policy backends, preference log and DPO."""
