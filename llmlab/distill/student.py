"""A student initialised from every other layer of its teacher (DistilBERT: Sanh et al. 2019,
"DistilBERT, a distilled version of BERT", arXiv:1910.01108, §3 "Student initialization").

The student is the teacher's architecture with half its layers (``n_layer // 2`` for GPT,
``num_hidden_layers // 2`` for BERT); it copies the teacher's embeddings, final norm, heads and pooler,
and teacher layers 0, 2, 4, ... as its layers 0, 1, 2, ... — "taking one layer out of two", so the
student starts from a network whose width and representation the teacher already shaped.
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace

from torch import nn

from llmlab.errors import UserError

# the layer-count field and the state-dict pattern of one layer, per architecture (llmlab.models)
LAYERS = {"GPTConfig": ("n_layer", re.compile(r"^(transformer\.h\.)(\d+)(\..*)$")),
          "BertConfig": ("num_hidden_layers", re.compile(r"^(layers\.)(\d+)(\..*)$"))}


def every_other_layer(teacher: nn.Module) -> nn.Module:
    """A new model of the teacher's class with half its layers, initialised from teacher layers 0, 2, 4 ...
    and every non-layer weight (embeddings, final norm, heads) — trainable, on the teacher's device."""
    kind = type(teacher.config).__name__
    if kind not in LAYERS:
        raise UserError(f"method.student_init=every_other copies layers of GPT and BERT teachers, not {kind}: "
                        "use method.student_init=null with a smaller model= preset")
    field, pattern = LAYERS[kind]
    n = getattr(teacher.config, field)
    if n < 2:
        raise UserError(f"method.student_init=every_other halves the teacher's {n} layer(s): it needs 2 or more")
    student = type(teacher)(replace(copy.deepcopy(teacher.config), **{field: n // 2}))
    state = {}
    for key, value in teacher.state_dict().items():
        m = pattern.match(key)
        if m is None:
            state[key] = value  # embeddings, final norm, heads, pooler
        elif int(m.group(2)) % 2 == 0 and int(m.group(2)) // 2 < n // 2:
            state[f"{m.group(1)}{int(m.group(2)) // 2}{m.group(3)}"] = value  # teacher layer 2i -> student layer i
    student.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    device = next(teacher.parameters()).device
    return student.to(device).train().requires_grad_(True)
