"""casf-proxy: an inline policy-enforcing sidecar reverse proxy.

Importing the package has no side effects; see ``proxy.cli`` for the entry
point, ``proxy.core`` for the decision pipeline and ``proxy.doors`` for its front doors.
"""

__version__ = "0.1.0"
