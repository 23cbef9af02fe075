"""Integrations of msattn with other libraries.

* :mod:`msattn.integrations.transformers`: the ``"msattn"`` attention implementation for
  MiniMax-M3 in Hugging Face transformers (``register()``).

Importing this package imports nothing but msattn; each integration imports its library when it
is itself imported.
"""

__all__ = ["transformers"]
