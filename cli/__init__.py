"""The `embedstore` command-line interface (installed as package ``embedstore_cli``)."""
