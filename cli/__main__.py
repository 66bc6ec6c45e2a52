"""``python -m jwt_cli``: the same as the ``jwt`` command."""

from .main import main

main()
