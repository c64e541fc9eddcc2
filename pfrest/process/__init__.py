"""The process(es) of ``pfrest serve``: the listening sockets of the endpoints and whom to take
(listener), one process's connections handed to conversations (serving), and with ``--workers`` the
arbiter that accepts and supervises (arbiter), its workers (worker) and the channel between them
(control).  Never the content of a request: a connection's bytes are the conversation's."""
