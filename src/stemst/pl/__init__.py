"""stemst.pl."""
