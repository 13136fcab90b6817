"""Model architectures as plain ``torch.nn.Module`` classes (no Lightning, no Hydra)."""
