"""Train and serve small neural classifiers of customer purchase behaviour."""

from purchasenet import resolvers as _resolvers

__version__ = "0.1.0"

_resolvers.register()
