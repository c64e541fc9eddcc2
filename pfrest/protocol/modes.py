"""The three endpoint modes, as the config file names them: Postfix's tcp_table(5), socketmap_table(5)
and policy delegation.  Only names: the codecs are tcptable.py, socketmap.py and policy.py."""

TCP, SOCKETMAP, POLICY = "tcp-lookup", "socketmap-lookup", "policy"
MODES = (TCP, SOCKETMAP, POLICY)
