"""The process(es) of ``pfrest serve``: the listening sockets of the endpoints and whom to take
(listener), one process's connections handed to conversations (serving), and with ``--workers`` the
arbiter that accepts (arbiter), chooses a worker for each connection (dispatch) and supervises the
workers (supervisor), the workers (worker) and the channel between them (control).  Never the content
of a request: a connection's bytes are the conversation's."""
