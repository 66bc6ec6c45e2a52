"""The ``jwt`` command line (installed as the ``jwt_cli`` package)."""
