"""The cc-docker client: the Python API client (client.api), the `ccd` command line and token minting."""
from client.api import (ApiError, Client, Conflict, ConnectionFailed, NotFound, OverLimit, Unauthorized,
                        Unavailable, ValidationError)

__all__ = ["ApiError", "Client", "Conflict", "ConnectionFailed", "NotFound", "OverLimit", "Unauthorized",
           "Unavailable", "ValidationError"]
