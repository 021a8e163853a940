"""Text and language models: offline loaders of the real text models and corpora that ship inside packages.

Submodules are imported on use (``from whatmatters.text.pretrained import load_smollm2``), so
``import whatmatters`` stays fast.
"""
