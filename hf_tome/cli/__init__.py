"""The ``hf-tome`` command line (``main``), its argument definitions (``args``) and the main job (``bench``)."""
