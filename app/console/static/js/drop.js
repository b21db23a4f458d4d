// Files of a drop: plain files as they are, and a dropped directory (a PEFT adapter folder) read through the
// File System entries API for the two files the upload takes.
const PEFT_FILES = ['adapter_config.json', 'adapter_model.safetensors'];

function fileOf(entry) {
  return new Promise((resolve, reject) => entry.file(resolve, reject));
}

function entriesOf(dir) {
  const reader = dir.createReader();
  const all = [];
  return new Promise((resolve, reject) => {
    const next = () => reader.readEntries((batch) => {
      if (!batch.length) { resolve(all); return; }
      all.push(...batch);
      next();
    }, reject);
    next();
  });
}

export async function filesOfDrop(transfer) {
  const entries = [...(transfer.items || [])].map((i) => i.webkitGetAsEntry && i.webkitGetAsEntry())
    .filter(Boolean);
  const dirs = entries.filter((e) => e.isDirectory);
  if (!dirs.length) return [...transfer.files];
  const inside = (await entriesOf(dirs[0])).filter((e) => e.isFile && PEFT_FILES.includes(e.name));
  return Promise.all(inside.map(fileOf));
}
