"""Postfix's side, as pure code: the three line protocols (tcp_table, socketmap, policy delegation), what
a backend answer means for each, and the exact reply bytes.  No sockets, threads or clocks here."""
