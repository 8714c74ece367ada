# %postun of edgeprobe-agent. Like %systemd_postun_with_restart: reload units, restart a
# running service after an upgrade. The user and /var/lib/edgeprobe are kept on erase
# (Fedora packaging guidelines: never remove a system user).
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 1 ]; then
        systemctl try-restart edgeprobe-agent.service >/dev/null 2>&1 || :
    fi
fi
exit 0
