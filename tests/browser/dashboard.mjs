export const dashboardTests = {};
