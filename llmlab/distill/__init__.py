"""Knowledge distillation: losses (:mod:`~llmlab.distill.losses`: temperature, forward/reverse KL, Hinton's
mix, MiniLLM), teacher-mixed sampling (:mod:`~llmlab.distill.sampling`) and the DistilBERT student init
(:mod:`~llmlab.distill.student`). No Lightning here: :class:`llmlab.methods.distill.Distillation` trains with them.

This file imports nothing heavy: :mod:`llmlab.schema` reads ``OBJECTIVES`` before torch is imported.
"""

OBJECTIVES = ("forward_kl", "reverse_kl", "minillm", "seq_kd")  # method.objective of method=distill
STUDENT_INITS = ("every_other",)  # method.student_init besides null (a fresh model= preset)
