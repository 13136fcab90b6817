"""Side-by-side benchmarks of llmlab's implementations against reference libraries.

Each module has a ``main(argv)`` run by ``llmlab bench NAME [options]``; e.g. :mod:`llmlab.bench.gpt`
times llmlab's GPT-2 against Hugging Face ``transformers`` (training and generation tokens/s) and
checks that both compute the same thing.
"""
