# %post of edgeprobe-agent. Like %systemd_post: apply the distribution preset on first
# install (the service stays disabled until certificates are in place, unless a preset
# says otherwise), nothing on upgrade.
install -d -m 0750 -o root -g edgeprobe /etc/edgeprobe/tls
if [ "$1" -eq 1 ] && [ -d /run/systemd/system ]; then
    systemctl --no-reload preset edgeprobe-agent.service >/dev/null 2>&1 || :
fi
exit 0
