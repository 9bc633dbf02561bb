"""Export of merged models (ONNX in Optimum's layout, ``torch.export``): ``hf-tome export onnx``.

- :mod:`hf_tome.export.onnx`: ``export_onnx(model, folder)`` writes ``model.onnx`` (``encoder_model.onnx`` for an
  encoder-decoder such as Whisper), ``config.json`` and the preprocessor config, with a dynamic batch axis, and
  checks onnxruntime against PyTorch; ``run_export`` is the command.
- :mod:`hf_tome.export.program`: ``export_program(model)``, the ``torch.export`` program of a merged model.
- :mod:`hf_tome.export.specs`: input and output names, axes and dummy inputs per family (Optimum's core).
- :mod:`hf_tome.export.options`: the command's options (no torch import, so ``hf-tome --help`` stays fast).
- ``optimum_register/hf_tome.py`` installs as ``optimum.commands.register.hf_tome``: ``optimum-cli export hf-tome``.

Nothing is imported here: the command line imports the options alone.
"""
