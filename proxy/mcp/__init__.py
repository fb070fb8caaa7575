"""MCP (Model Context Protocol) over streamable HTTP: the protocol layer.

Pure modules, no I/O: :mod:`proxy.mcp.config` reads the ``mcp:`` config
section, :mod:`proxy.mcp.protocol` classifies one POSTed JSON-RPC message,
checks the mirrored ``Mcp-*`` headers against it and builds the answers the
proxy gives on its own (denials, malformed messages, replays),
:mod:`proxy.mcp.sse` parses and writes ``text/event-stream`` incrementally and
:mod:`proxy.mcp.listing` filters ``tools/list`` results. The front door that
owns the connection plugs these into the decision core.
"""
