# %preun of edgeprobe-agent. Like %systemd_preun: stop and disable on erase, not on upgrade.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload disable --now edgeprobe-agent.service >/dev/null 2>&1 || :
fi
exit 0
