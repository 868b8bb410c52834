"""The recipe kit: what the runnable recipes in ``recipes/`` share, kept apart from the method library.

``flexlora`` (the library) never imports from here. Install the kit's extra dependencies with
``pip install -e .[recipes]``.

* ``run_config``: yaml + typed dataclasses + ``key=value`` overrides, ``--help``, the shared config sections.
* ``models``: model locations (hub, folder, ``package:<name>``), GGUF conversion, dtype / attention choice.
* ``methods``: FlexLoRA, PEFT LoRA and PEFT AdaLoRA behind one interface, under one budget rule.
* ``records``: metric trackers (TensorBoard / wandb through accelerate, JSON lines), the rank-allocation heatmap.
* ``checkpoints``: atomic checkpoints with exact resume.
* ``loop``: the optimizer-step loop every recipe runs, and a recipe's start-up.
* ``classifier``: train-and-evaluate for classifier recipes (GLUE, VTAB).
* ``scoring``: lm-eval scoring of the commonsense suite.
* ``data``: the data sets (commonsense in LLM-Adapters format, GLUE, VTAB-1k).
"""
