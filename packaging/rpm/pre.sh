# %pre of edgeprobe-agent and edgeprobe-collector: the shared system user exists before
# the files are laid down, so they can be owned by its group.
getent group edgeprobe >/dev/null || groupadd -r edgeprobe
getent passwd edgeprobe >/dev/null || \
    useradd -r -g edgeprobe -d /var/lib/edgeprobe -M -s /sbin/nologin \
        -c "edgeprobe network measurement" edgeprobe
exit 0
