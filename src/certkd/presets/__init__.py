"""Built-in presets (``NAME.yaml``), shipped as package data and read with :mod:`importlib.resources`.

``certkd presets`` lists them with the first comment line of each; ``--preset NAME`` loads one
(:func:`certkd.config.load_preset`). A preset is a YAML mapping of :class:`certkd.config.TrainConfig`
keys; users' own files work the same way (``--preset path/to/mine.yaml``, or a folder of them in
``$CERTKD_CONFIG_DIR``).
"""
