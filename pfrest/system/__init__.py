"""What a pfrest process asks of the operating system: its one event loop (eventloop), listening
sockets and the allow-from check (sockets), unix socket files made without following a link
(socketfiles), the drop of root's privileges (privileges) and systemd's socket hand-over and
notifications (systemd).  Never a request: nothing here reads Postfix's or the backend's bytes."""
