"""Train and serve small neural classifiers of customer purchase behaviour."""

__version__ = "0.1.0"
