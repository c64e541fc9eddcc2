"""One Postfix client's conversation, the same code for ``pfrest handle`` (fd 0/1: stdio) and every
connection ``pfrest serve`` accepts: read, decode, ask the backend, reply (conversation), with each
endpoint's mode, backend client and counters (services) and the one log line per request (requestlog).
This is where a tcp_table, socketmap or policy request becomes an HTTP request.  Never a listening
socket, a signal or a process: those are pfrest/process/'s."""
