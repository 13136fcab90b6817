"""Hugging Face interop for the architectures in :mod:`llmlab.models`: reading local
``save_pretrained`` directories (:mod:`.io`) and converting configs and state dicts both ways
(:mod:`.gpt2`, :mod:`.bert`, :mod:`.t5`). The architecture classes reach these through thin
``from_pretrained`` / ``to_hf_state_dict`` / ``to_hf_config`` methods."""
