"""llmlab: every method of modern language modelling as a Hydra-composed Lightning experiment."""

__version__ = "0.1.0"

from llmlab.distributed import register_resolvers as _register_resolvers

_register_resolvers()  # ${precision_for:ACCELERATOR} in conf/trainer/ddp.yaml resolves wherever llmlab is imported
