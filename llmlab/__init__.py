"""llmlab: every method of modern language modelling as a Hydra-composed Lightning experiment."""

__version__ = "0.1.0"
