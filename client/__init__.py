"""The cc-docker client: the `ccd` command line and token minting."""
