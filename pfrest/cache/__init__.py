"""The answers pfrest keeps: each process's own cache in front of the backend client (local) and the
shared cache on Redis or Valkey behind it (shared, over one pipelined connection: redispipe, redisclient),
its keys, entries and messages as bytes (sharedformat, pure) and its invalidation channel (invalidation).
Never a Postfix protocol and never a socket it listens on: it sits between a conversation and the HTTP
side (pfrest/backend/)."""
