"""The four endpoint modes, as the config file names them: Postfix's tcp_table(5), socketmap_table(5),
policy delegation, and SMTP AUTH over Dovecot's auth protocol.  Only names: the codecs are tcptable.py,
socketmap.py, policy.py and dovecotauth.py."""

TCP, SOCKETMAP, POLICY, SASL = "tcp-lookup", "socketmap-lookup", "policy", "dovecot-sasl"
MODES = (TCP, SOCKETMAP, POLICY, SASL)
LOOKUPS = (TCP, SOCKETMAP)
