// Small progressive enhancements; every page works without this file.
document.addEventListener("DOMContentLoaded", () => {
  // Ask before actions marked with data-confirm (e.g. re-queue).
  document.querySelectorAll("[data-confirm]").forEach((button) => {
    button.addEventListener("click", (event) => {
      if (!window.confirm(button.dataset.confirm)) event.preventDefault();
    });
  });
  // Keep filter URLs short: blank fields are not sent (the server ignores them anyway).
  const filters = document.getElementById("filters");
  if (filters) {
    filters.addEventListener("submit", () => {
      filters.querySelectorAll("input, select").forEach((field) => {
        if (field.value === "") field.disabled = true;
      });
    });
  }
});
