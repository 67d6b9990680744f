"""Training configs, as code (big_vision style): each module's ``get_config()`` returns an
``ml_collections.ConfigDict``, and its docstring gives the command that runs it. Any field can
be overridden on the command line, e.g. ``--config.total_steps=20``."""
