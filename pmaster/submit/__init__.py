"""Local submission: the sendmail(1) command line and the daemon's pickup of what it drops (SPEC 10)."""
