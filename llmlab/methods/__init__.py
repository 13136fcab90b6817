"""One LightningModule per training objective (see base.LLMLabModule for the shared plumbing)."""
