"""systemd: the user service unit (`trainsup service`) and the Type=notify protocol."""
