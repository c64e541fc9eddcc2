"""The process around the protocol and the HTTP side: the conversation driver on the event loop, the
``handle`` entry point on stdin/stdout, and ``serve``'s listener, workers, signals and privileges."""
