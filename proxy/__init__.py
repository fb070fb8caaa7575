"""casf-proxy: an inline policy-enforcing sidecar reverse proxy.

Importing the package has no side effects; see ``proxy.cli`` for the entry
point and ``proxy.pipeline`` for the request pipeline.
"""

__version__ = "0.1.0"
