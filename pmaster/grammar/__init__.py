"""PLY grammars: the configuration language (cf) and SMTP command lines (smtp)."""
