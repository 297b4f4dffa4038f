"""trekeys: key management and recovery runbooks for a Trusted Research Environment."""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
